"""Import stand-in for mamba_ssm's compiled Mamba-1 extension, so a CUDA-less mamba_ssm build imports
(its package __init__ imports the Mamba-1 ops). Nothing on the Mamba-2 paths the tests use calls it."""
