"""The backport's wrappers of OpenRLHF's methods (released OpenRLHF, no callback API) never raise into its loops:
a stop lookup that fails lets the rollout go on, odd restored states still let OpenRLHF's own restore run."""

from types import SimpleNamespace

from openrlhf_bai.integration import backport


def test_a_failing_stop_lookup_lets_the_rollout_go_on(monkeypatch, caplog):
    def broken(args):
        raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(backport, "stop_published", broken)
    generate = backport._wrap_generate_samples(lambda self, **kwargs: ("rollout", kwargs))
    generator = SimpleNamespace(args=SimpleNamespace())
    assert generate(generator, temperature=1.0) == ("rollout", {"temperature": 1.0})  # OpenRLHF's own batch
    assert generate(generator) == ("rollout", {})  # and again: nothing is remembered as a stop


def test_restored_states_of_any_shape_still_reach_openrlhfs_restore():
    restored = []
    restore = backport._wrap_restore(lambda self, states: restored.append(states) or "restored")
    trainer = SimpleNamespace()
    assert restore(trainer, {"bai_monitor": {"steps": 3}}) == "restored"
    assert trainer.checkpoint_states == {"bai_monitor": {"steps": 3}}
    assert restore(trainer, 7) == "restored" and restored == [{"bai_monitor": {"steps": 3}}, 7]
    assert trainer._bai_errors["count"] == 1  # counted in bai/monitor_errors, not raised
