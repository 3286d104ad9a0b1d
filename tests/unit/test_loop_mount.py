"""The in-process loop mount's ioctl argument has the kernel's layout (linux/loop.h): a wrong
size or offset would bind the wrong file or flags, so it is pinned here; the mount itself is
exercised by tests/integration/test_disk_limit.py and tests/fault/test_disk.py."""

from __future__ import annotations

import struct

from fastsandbox.agent.runtime import loop_mount


def test_loop_config_is_the_kernels_struct() -> None:
    config = loop_mount._config(7, b"/x.img")
    # sizeof(struct loop_config) on every Linux ABI: 4 + 4 + 232 (loop_info64) + 64.
    assert len(config) == 304
    fd, block_size = struct.unpack_from("=II", config)
    assert (fd, block_size) == (7, 0)
    # lo_flags: the 4th u32 after the five u64 of loop_info64; autoclear only.
    flags = struct.unpack_from("=I", config, 8 + 5 * 8 + 3 * 4)[0]
    assert flags == 4
    assert config[8 + 56 : 8 + 56 + 6] == b"/x.img"


def test_a_long_image_path_is_cut_to_fit_the_name_field() -> None:
    config = loop_mount._config(3, b"/" + b"a" * 200)
    assert len(config) == 304
    assert config[8 + 56 + 63] == 0  # NUL-terminated within file_name[64]
