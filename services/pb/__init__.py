"""Generated protobuf and gRPC code for the ssjf.v1 contract. Do not edit: `make proto`."""
