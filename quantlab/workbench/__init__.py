"""The workbench: run configs (`config`), the sweep pipeline (`pipeline`), the results store
(`store`), reports (`report`) and the VRAM fit planner (`plan`)."""
