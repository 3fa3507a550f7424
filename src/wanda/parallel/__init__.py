"""Several processes through ``torch.distributed``: the ranks and the collectives the block walk calls."""
