"""Registration engines behind one seam (``base.RegistrationEngine``)."""

from bids_app.registration.base import RegistrationEngine, RegistrationResult, get_engine

__all__ = ["RegistrationEngine", "RegistrationResult", "get_engine"]
