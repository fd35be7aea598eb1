"""Stage 5, solve: one strategy per node. program holds the integer program (one builder per
constraint family), runs solves runs of identical layers once, solve orchestrates."""
