"""LeRobot plugin: a walkforge bundle as `--policy.type=walkforge --policy.bundle=PATH`.

LeRobot's commands import every installed `lerobot_policy_*` distribution
(`register_third_party_plugins`); importing this package registers the config type "walkforge".
LeRobot then finds the policy in `modeling_walkforge` and the processors in
`processor_walkforge` by its naming convention. walkforge itself is imported only when a policy
is built, so a missing walkforge never stops LeRobot from starting. docs/lerobot_plugin.md.
"""

from .configuration_walkforge import WalkforgeConfig
from .modeling_walkforge import WalkforgePolicy, save_policy_folder
from .processor_walkforge import make_walkforge_pre_post_processors

__version__ = "0.1.0"
__all__ = ["WalkforgeConfig", "WalkforgePolicy", "make_walkforge_pre_post_processors", "save_policy_folder"]
