"""What runs inside a stage's process: per-request error handling, batching, micro-batch pipelining, the CPU-lane
balancer, pinned and coalesced host-to-device copies, torch threads per instance."""
