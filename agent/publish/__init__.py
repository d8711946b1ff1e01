"""Publishers: results to MQTT (PLCs) and Redis Streams (dashboards), each behind its own outbox."""
