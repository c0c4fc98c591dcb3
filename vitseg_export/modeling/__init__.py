"""checkpoint -> nn.Module: the model families and their registry."""
