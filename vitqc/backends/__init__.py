"""Backends lower a materialized artifact to deployable code.

Not written yet: packed low-bit kernels and ExecuTorch lowering are planned (see the project issues).
The artifact already holds what they need: integer weight codes, scales and activation ranges.
"""
