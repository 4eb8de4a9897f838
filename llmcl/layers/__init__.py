"""Model code shared by methods and the checkpoint loader (layers that are not PEFT tuners)."""
