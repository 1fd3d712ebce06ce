"""The read API: web frontends fetch a user's cached recommendations over HTTP."""

from api.app import build_app
from api.settings import ApiSettings

__all__ = ["ApiSettings", "build_app"]
