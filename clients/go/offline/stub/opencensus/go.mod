module go.opencensus.io
