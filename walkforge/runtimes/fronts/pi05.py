"""pi0.5's front is the flow VLAs' one (runtimes/fronts/flow.py); this name stays importable."""

from walkforge.runtimes.fronts.flow import Pi05Policy

__all__ = ["Pi05Policy"]
