module github.com/googleapis/gax-go/v2
