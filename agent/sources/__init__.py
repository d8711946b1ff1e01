"""Frame sources: one capture thread per camera (OpenCV, a watched folder, synthetic parts)."""
