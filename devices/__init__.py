"""Device profiles: which execution providers, options and threads a board wants, as data (one TOML file each)."""
from devices.profiles import Profile, ProfileError, load_profile, profile_names

__all__ = ["Profile", "ProfileError", "load_profile", "profile_names"]
