"""Everything that talks to torch.distributed: environment, collectives, engines."""
