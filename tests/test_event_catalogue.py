"""The committed event catalogue is exactly what the code generates."""

from clearhouse.catalogue import CATALOGUE, render


def test_event_catalogue_is_generated_from_the_current_code():
    assert CATALOGUE.read_text() == render(), "run `bin/clearhouse events catalogue` and commit the result"
