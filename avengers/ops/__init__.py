"""Pure tensor functions shared by the model families (avengers.models) and the decode layer
(avengers.decode): RoPE, the telescoping cache's numerics, dtype names. Imports torch only."""
