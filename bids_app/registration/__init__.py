"""Registration engines behind one seam (``base.RegistrationEngine``), listed in ``registry``."""

from bids_app.registration.base import RegistrationEngine, RegistrationResult
from bids_app.registration.registry import ENGINES, get_engine, get_preset

__all__ = ["ENGINES", "RegistrationEngine", "RegistrationResult", "get_engine", "get_preset"]
