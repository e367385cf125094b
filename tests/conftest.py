import os

from hypothesis import settings

# Fast by default; HYPOTHESIS_PROFILE=slow for a thorough run.
settings.register_profile("fast", max_examples=200, deadline=None)
settings.register_profile("slow", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
