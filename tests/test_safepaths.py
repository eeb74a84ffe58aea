"""safepaths: the ownership and mode checks of directories and files other users might share.

The checks on tmp_path; the attacks by a real second user on a real root daemon are in
test_security_users.py, the planted files against each writer in test_security_files.py.
"""

import os
import stat

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from torchcore import safepaths
from torchcore.errors import DaemonError
from torchcore.safepaths import UnsafePath, check_dir, open_file, problem_with, secure_dir

ROOT = os.geteuid() == 0
OTHER = 65534       # nobody
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to give files to another user")


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_with_the_documented_modes(tmp_path):
    old = os.umask(0o022)
    try:
        secure_dir(tmp_path / "a" / "b" / "state", safepaths.STATE_DIR_MODE, private=True)
        secure_dir(tmp_path / "logs", safepaths.LOG_DIR_MODE)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "a") == 0o755 and mode_of(tmp_path / "a" / "b") == 0o755
    assert mode_of(tmp_path / "a" / "b" / "state") == 0o700
    assert mode_of(tmp_path / "logs") == 0o750


def test_a_readable_log_dir_is_tightened(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o755)
    secure_dir(logs, safepaths.LOG_DIR_MODE, what="log_dir")
    assert mode_of(logs) == 0o750


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o1777, 0o722])
def test_a_log_dir_writable_by_others_is_refused_naming_path_owner_and_mode(tmp_path, mode):
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, mode)
    with pytest.raises(UnsafePath) as caught:
        secure_dir(logs, safepaths.LOG_DIR_MODE, what="log_dir")
    message = str(caught.value)
    assert str(logs) in message and f"mode {mode:04o}" in message and "owned by uid" in message
    assert mode_of(logs) == mode        # refused, not silently changed


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o755])
def test_a_state_dir_others_can_enter_is_refused(tmp_path, mode):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    with pytest.raises(UnsafePath, match=rf"accessible by group or others \(mode {mode:04o}\)"):
        secure_dir(state, safepaths.STATE_DIR_MODE, what="state directory", private=True)


def test_a_file_where_a_directory_should_be_is_an_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DaemonError, match="is not a directory"):
        secure_dir(tmp_path / "f" / "logs", safepaths.LOG_DIR_MODE)


def test_an_ancestor_writable_by_others_without_sticky_bit_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(UnsafePath, match="without the sticky bit") as caught:
        secure_dir(tmp_path / "open" / "logs", safepaths.LOG_DIR_MODE, what="log_dir")
    assert str(tmp_path / "open") in str(caught.value) and "mode 0777" in str(caught.value)
    assert not (tmp_path / "open" / "logs").exists()      # refused before creating anything


def test_a_sticky_shared_ancestor_is_fine_for_our_own_entry(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    secure_dir(shared / "logs", safepaths.LOG_DIR_MODE)
    assert mode_of(shared / "logs") == 0o750


def test_symlinks_in_trusted_directories_are_followed(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink("../real/x", tmp_path / "real" / "rel")     # relative, with ..
    secure_dir(tmp_path / "link" / "rel", safepaths.LOG_DIR_MODE)
    assert (tmp_path / "real" / "x").is_dir()


def test_a_symlink_loop_is_an_error_not_a_hang(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(DaemonError, match="too many levels"):
        secure_dir(tmp_path / "a" / "logs", safepaths.LOG_DIR_MODE)


@needs_root
def test_a_directory_of_another_user_is_refused(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    os.chown(logs, OTHER, OTHER)
    with pytest.raises(UnsafePath, match=rf"log_dir {logs} is owned by uid {OTHER}"):
        secure_dir(logs, safepaths.LOG_DIR_MODE, what="log_dir")


@needs_root
def test_an_ancestor_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(UnsafePath, match=f"{theirs} is owned by uid {OTHER}"):
        secure_dir(theirs / "logs", safepaths.LOG_DIR_MODE, what="log_dir")


@needs_root
def test_an_entry_another_user_made_in_a_sticky_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (tmp_path / "mine").mkdir(mode=0o700)
    os.symlink(tmp_path / "mine", shared / "link")
    os.lchown(shared / "link", OTHER, OTHER)                # their symlink to our directory
    with pytest.raises(UnsafePath, match="another user created it"):
        secure_dir(shared / "link", safepaths.STATE_DIR_MODE, private=True)


# ---- the rule, on generated chains -----------------------------------------------------------

LEVEL = st.fixed_dictionaries({
    "mode": st.sampled_from([0o700, 0o750, 0o755, 0o775, 0o777, 0o1777, 0o1775, 0o705]),
    "other_owner": st.booleans() if ROOT else st.just(False),   # the directory's owner
    "symlink": st.booleans(),             # reached through a symlink in the level above
    "link_other": st.booleans() if ROOT else st.just(False),    # that symlink's owner
})


def expected_refusal(levels, private):
    """The documented rule, level by level (the first level hangs off a trusted tmp_path)."""
    parent_shared = False
    for index, level in enumerate(levels):
        final = index == len(levels) - 1
        entry_other = level["link_other"] if level["symlink"] else level["other_owner"]
        if parent_shared and entry_other:
            return True                         # an entry another user made in a shared dir
        if level["other_owner"]:
            return True                         # on the way or final: another user's directory
        writable = level["mode"] & 0o022
        if not final and writable and not level["mode"] & 0o1000:
            return True                         # others could rename what is inside
        if final and (writable or (private and level["mode"] & 0o077)):
            return True
        parent_shared = bool(writable)
    return False


def build_chain(base, levels):
    """Level i is a directory inside level i-1 (or base), or a symlink there to a directory
    made directly under base; returns (the path as written, the directories by level)."""
    parent, path, dirs = base, base, []
    for index, level in enumerate(levels):
        if level["symlink"]:
            target = base / f"target{index}"
            target.mkdir()
            os.symlink(target, parent / f"link{index}")
            if level["link_other"]:
                os.lchown(parent / f"link{index}", OTHER, OTHER)
            path = path / f"link{index}"
        else:
            target = parent / f"dir{index}"
            target.mkdir()
            path = path / f"dir{index}"
        dirs.append(target)
        parent = target
    for level, directory in zip(levels, dirs):
        if level["other_owner"]:
            os.chown(directory, OTHER, OTHER)
        os.chmod(directory, level["mode"])
    return path, dirs


def their_link_in_a_sticky_dir(test):
    """Always try: their symlink, in a sticky shared directory, to a directory of ours."""
    if not ROOT:
        return test
    shared = {"mode": 0o1777, "other_owner": False, "symlink": False, "link_other": False}
    link = {"mode": 0o700, "other_owner": False, "symlink": True, "link_other": True}
    return example(levels=[shared, link], private=True)(test)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(levels=st.lists(LEVEL, min_size=1, max_size=4), private=st.booleans())
@their_link_in_a_sticky_dir
def test_generated_chains_follow_the_rule(tmp_path_factory, levels, private):
    base = tmp_path_factory.mktemp("chain")
    path, dirs = build_chain(base, levels)
    try:
        if expected_refusal(levels, private):
            with pytest.raises(UnsafePath):
                check_dir(path, private=private)
        else:
            check_dir(path, private=private)
    finally:
        for directory in dirs:
            os.chmod(directory, 0o700)


# ---- files -----------------------------------------------------------------------------------

def test_open_file_creates_with_the_mode_and_tightens_a_looser_one(tmp_path):
    old = os.umask(0)
    try:
        os.close(open_file(tmp_path / "new", os.O_WRONLY | os.O_CREAT, 0o640))
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "new") == 0o640
    (tmp_path / "old").write_text("x")
    os.chmod(tmp_path / "old", 0o666)
    os.close(open_file(tmp_path / "old", os.O_WRONLY | os.O_APPEND, 0o640))
    assert mode_of(tmp_path / "old") == 0o640


def plant_symlink(path, victim):
    os.symlink(victim, path)


def plant_dangling_symlink(path, victim):
    os.symlink(str(victim) + ".created", path)


def plant_hard_link(path, victim):
    os.link(victim, path)


def plant_fifo(path, victim):
    os.mkfifo(path)


def plant_directory(path, victim):
    os.mkdir(path)


PLANTS = [plant_symlink, plant_dangling_symlink, plant_hard_link, plant_fifo, plant_directory]


@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("flags", [os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_RDWR | os.O_CREAT,
                                   os.O_WRONLY])
def test_open_file_refuses_what_was_planted(tmp_path, plant, flags):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    before = os.stat(victim)
    plant(tmp_path / "target", victim)
    with pytest.raises(OSError):            # UnsafePath, or EISDIR for a directory
        os.close(open_file(tmp_path / "target", flags, 0o640))
    assert victim.read_text() == "precious\n"
    after = os.stat(victim)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == \
        (before.st_mode, before.st_size, before.st_mtime_ns)
    assert not os.path.exists(str(victim) + ".created")


@needs_root
def test_open_file_refuses_another_users_file(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.write_text("")
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(UnsafePath, match=f"is owned by uid {OTHER}"):
        open_file(theirs, os.O_WRONLY | os.O_APPEND, 0o640)


def test_problem_with_a_new_setting_creates_nothing(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    assert "without the sticky bit" in problem_with("log_dir", str(tmp_path / "open" / "x"))
    assert not (tmp_path / "open" / "x").exists()
    assert problem_with("state_dir", str(tmp_path / "fine" / "state")) == ""
    assert not (tmp_path / "fine").exists()
    assert problem_with("pidfile", str(tmp_path / "tc.pid")) == ""
