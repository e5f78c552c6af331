"""Code shared by more than one service: configuration, logging, gRPC serving, Redis."""
