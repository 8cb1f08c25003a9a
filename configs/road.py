"""RoAd on the synthetic suite: scaled 2D rotations of the q and v projections' outputs.

    peftjax train --config configs/road.py --workdir runs/road
    peftjax train --config configs/road.py:per_task --workdir runs/road_per_task
    peftjax train --config configs/road.py:quick --workdir /tmp/road   # a smoke run

road_1 (one angle and scale per output pair, out/2 of each per layer) in groups of 64 outputs,
which divide the quickstart base's 128-wide q and v. Rotations start at the identity.
"""

from configs.suite import suite_config


def get_config(arg: str = ""):
    config = suite_config(arg)
    config.peft.method = "road"
    config.peft.targets = r".*attention\.(q|v)"
    config.peft.road_variant = "road_1"
    config.peft.road_group_size = 64
    return config
