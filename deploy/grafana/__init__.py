"""The Grafana dashboard of kvrelay and the script that builds it."""
