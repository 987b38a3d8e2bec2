module github.com/prometheus/client_model
