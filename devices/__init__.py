"""Device profiles: which execution providers, options, threads and quantization a board wants, as data
(one TOML file each), and detection of the board this runs on."""
from edge.devices.detect import Choice, Device, choose_profile, read_device, resolve, unsupported_userland
from edge.devices.profiles import Profile, ProfileError, all_profiles, load_profile, profile_names

__all__ = ["Choice", "Device", "Profile", "ProfileError", "all_profiles", "choose_profile", "load_profile",
           "profile_names", "read_device", "resolve", "unsupported_userland"]
