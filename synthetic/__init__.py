"""Synthetic parts and defects: procedural good surfaces and defects drawn on them with exact masks.

Shared by the synthetic cameras (`agent/sources/synthetic.py`), the demo, the benches and the
trainer's data set writer (`trainer/synth.py`); it imports nothing of those.

    kinds.py     DEFECT_KINDS, TEXTURE_FAMILIES, normalise_kind (no OpenCV: configs name them)
    textures.py  render_texture, instance_seed, write_good_images
    defects.py   apply_defect, make_part and one function per defect kind
    plc.py       Plc, PartTracker, Conveyor: a PLC stand-in on MQTT (triggers, part FIFOs, reject station)
"""
