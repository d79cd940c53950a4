"""pi0's front is the flow VLAs' one (runtimes/fronts/flow.py); this name stays importable."""

from walkforge.runtimes.fronts.flow import Pi0Policy, compact

__all__ = ["Pi0Policy", "compact"]
