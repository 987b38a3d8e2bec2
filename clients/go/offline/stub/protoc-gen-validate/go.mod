module github.com/envoyproxy/protoc-gen-validate
