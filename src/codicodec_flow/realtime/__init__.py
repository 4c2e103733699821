"""Real-time streaming: engine, sinks, live controls (keys and a JSON protocol), live input for accompaniment.

Data flows one way: controls (state.py) -> LiveGenerator (generator.py) -> Engine (engine.py) -> AudioRing
(ring.py) -> sink (sinks.py). The session's wiring lives in session.py; the command line in
commands/realtime.py.
"""
