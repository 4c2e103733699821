"""Real-time streaming: engine, sinks, live controls (keys and a JSON protocol), live input for accompaniment.

Data flows one way: controls (state.py) -> LiveGenerator (generator.py) -> Engine (engine.py) -> AudioRing
(ring.py) -> sink (sinks.py). The command line lives in command.py, the session's wiring in session.py.
"""
