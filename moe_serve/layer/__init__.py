"""The MoE layer's maths, torch only (no gRPC, no asyncio), in the order a token meets it:
`gating` (scores, top-k, capacity) → `placement` (who holds which expert) → `dispatch`
(pairs per worker, combine) → `experts` (the grouped local forward); `reference` is the
in-process oracle every served path is checked against."""
