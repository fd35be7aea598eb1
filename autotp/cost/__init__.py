"""Stage 4, cost: device specs (devices), the formulas for compute, collectives and memory
(model), and the cost of a whole plan (evaluate), which the solver linearizes."""
