"""Attacks that measure what a shared gradient leaks (``sgdlab attack ...``): :mod:`.dlg` (DLG and iDLG)."""
