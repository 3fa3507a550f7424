"""What every layer uses: devices, atomic file outputs, memory accounting, hub access, settings declaration."""
