"""The live page of the line, served on the agent's HTTP port (agent/health.py) beside /healthz and /metrics.

- `config.py`: the `[page]` section (credentials, stream caps, anonymous viewing);
- `auth.py`: who is logged in (a token or a user and password from the credentials, sessions in memory);
- `live.py`: the feed the result thread hands every part to (latest per camera, last NG parts, recent parts);
- `render.py`: frames, heat maps and defect boxes drawn for people (drawing only);
- `encoder.py`: the encoder thread: JPEGs per watched camera at a capped rate, nothing when nobody watches;
- `views.py`: the typed JSON the page reads (parts, per-camera counters, line status);
- `routes.py`: the HTTP endpoints (page, MJPEG, server-sent events, operator actions);
- `static/`: the page itself, plain HTML/CSS/JS (no build step, nothing from the internet).
"""
