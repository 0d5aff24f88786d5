"""The devices and the mesh over them: (data, fsdp, tensor) meshes, logical axis rules, sharded state, and
the peak FLOP/s of a device (the denominator of MFU)."""
