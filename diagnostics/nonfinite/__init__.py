"""Non-finite provenance, replay and automatic taps; torch only, no nnunetv2.

``loss_spec`` loads a user's loss from the SPEC they typed; ``sites`` names a call by the user's source line;
``autotaps`` measures the numerically risky calls of any loss while it runs; ``override`` changes a clamp bound
or a sqrt's added constant at a chosen line without editing the user's file.
"""
