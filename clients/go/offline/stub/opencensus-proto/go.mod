module github.com/census-instrumentation/opencensus-proto
