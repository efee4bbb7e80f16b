"""Parity with the released reference implementations (run by ``nox -s parity``)."""
