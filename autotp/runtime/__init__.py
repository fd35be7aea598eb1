"""What a user calls and holds: the one pipeline (capture -> candidates -> solve -> plan ->
rewrite), plan()/parallelize() (api), ParallelModule, weights sources, checkpoints and
calibration of the cost model on the live process group."""
