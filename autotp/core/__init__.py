"""Shared vocabulary of every stage: placements (Shard, Replicate, Partial and how a split
divides a dim), tensor metas, dotted attribute paths, and the one PlanOptions type."""
