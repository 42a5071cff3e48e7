"""Serving plans: what fits on which accelerators, compiled for TPUs that need not be here
(`report.make_plan`; the command is `launch/info.py --plan`)."""
