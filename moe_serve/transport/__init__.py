"""Bytes and sockets, no MoE maths: `wire` (tensors <-> protobuf bytes), `shm` (same-host
regions), `auth` (tokens), `tls` (certificates), `calls` (the client side of a call) and
`server` (the gRPC server and process every moe_serve service runs in)."""
