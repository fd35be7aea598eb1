"""Stage 7, rewrite: the Plan applied to the captured graph for one rank (rewrite), with the
collectives as autograd Functions whose backward is the conjugate collective (collectives)."""
