"""Per-key recurrent state for many keys in one ONNX Runtime call: the operator (``operator``), its state slabs
(``slab``, ``device_slab``), how a call's keys are packed (``packing``), snapshots (``snapshot``) and carried-state
health (``health``)."""
