"""TorchServe integration: request parsing, per-request replies, the pipelined services, launcher, archives."""
