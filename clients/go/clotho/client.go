// Package clotho is a small hand-written client over the generated clotho.v1 stubs
// (package clothov1): connect to a gateway with a bearer token, submit scored groups,
// generate through the gateway, and consume batches with credit-based flow control.
//
// Every call takes a context first; errors are wrapped with %w (use Code to read the
// gRPC status code through the wrapping). Dial takes ...grpc.DialOption, so transport
// security, interceptors and the rest stay the caller's choice:
//
//	opts := append(clotho.BearerToken(token), grpc.WithInsecure())
//	c, err := clotho.Dial(ctx, "127.0.0.1:50051", opts...)
package clotho

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	clothov1 "github.com/clotho/clotho/clients/go/gen/clotho/v1"
)

// Client talks to one gateway: GatewayService (trajectories and generation).
type Client struct {
	conn *grpc.ClientConn
	// Gateway is the generated stub on the client's connection, for the calls the
	// helpers below do not wrap (GetStatus, GetInfo, ResetData, ...).
	Gateway clothov1.GatewayServiceClient
}

// Dial connects to a gateway at target ("host:port"). The trace-context interceptors
// are always installed; options come after them.
func Dial(ctx context.Context, target string, opts ...grpc.DialOption) (*Client, error) {
	all := append(TraceContextOptions(), opts...)
	conn, err := grpc.DialContext(ctx, target, all...)
	if err != nil {
		return nil, fmt.Errorf("clotho: dial %s: %w", target, err)
	}
	return NewClient(conn), nil
}

// NewClient wraps a connection the caller opened.
func NewClient(conn *grpc.ClientConn) *Client {
	return &Client{conn: conn, Gateway: clothov1.NewGatewayServiceClient(conn)}
}

// Close closes the connection.
func (c *Client) Close() error {
	if err := c.conn.Close(); err != nil {
		return fmt.Errorf("clotho: close: %w", err)
	}
	return nil
}

// Code is the gRPC status code of err, looking through %w wrapping; codes.OK for nil
// and codes.Unknown for an error that carries no status.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	var withStatus interface{ GRPCStatus() *status.Status }
	if errors.As(err, &withStatus) {
		return withStatus.GRPCStatus().Code()
	}
	return codes.Unknown
}

// RegisterTrainer registers a trainer and its batch geometry; returns its id.
func (c *Client) RegisterTrainer(ctx context.Context, req *clothov1.RegisterTrainerRequest) (string, error) {
	resp, err := c.Gateway.RegisterTrainer(ctx, req)
	if err != nil {
		return "", fmt.Errorf("clotho: register trainer: %w", err)
	}
	return resp.GetUuid(), nil
}

// RegisterEnv registers an environment. The answer's Status is "wait for trainer to
// start" until a trainer asked for its first batch.
func (c *Client) RegisterEnv(ctx context.Context, req *clothov1.RegisterEnvRequest) (*clothov1.RegisterEnvResponse, error) {
	resp, err := c.Gateway.RegisterEnv(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("clotho: register env: %w", err)
	}
	return resp, nil
}

// Submit sends scored groups on one SubmitScoredData stream; they enter the queue
// together once the gateway has them all (all or nothing).
func (c *Client) Submit(ctx context.Context, groups []*clothov1.ScoredGroup) (*clothov1.SubmitScoredDataResponse, error) {
	stream, err := c.Gateway.SubmitScoredData(ctx)
	if err != nil {
		return nil, fmt.Errorf("clotho: submit: %w", err)
	}
	for i, g := range groups {
		if err := stream.Send(&clothov1.SubmitScoredDataRequest{Group: g}); err != nil {
			if errors.Is(err, io.EOF) {
				// The server ended the call; its status comes with CloseAndRecv.
				break
			}
			return nil, fmt.Errorf("clotho: submit group %d: %w", i, err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, fmt.Errorf("clotho: submit: %w", err)
	}
	return resp, nil
}

// Generate runs one prompt through the gateway (routed to the least loaded healthy
// inference service) and returns every sample's final Completion, in sample order.
func (c *Client) Generate(ctx context.Context, req *clothov1.GenerateRequest) ([]*clothov1.Completion, error) {
	stream, err := c.Gateway.Generate(ctx, &clothov1.GatewayServiceGenerateRequest{Request: req})
	if err != nil {
		return nil, fmt.Errorf("clotho: generate: %w", err)
	}
	done := map[uint32]*clothov1.Completion{}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("clotho: generate: %w", err)
		}
		if completion := msg.GetResponse().GetCompletion(); completion != nil {
			done[msg.GetResponse().GetIndex()] = completion
		}
	}
	indexes := make([]int, 0, len(done))
	for i := range done {
		indexes = append(indexes, int(i))
	}
	sort.Ints(indexes)
	out := make([]*clothov1.Completion, 0, len(done))
	for _, i := range indexes {
		out = append(out, done[uint32(i)])
	}
	return out, nil
}

// BatchStream hands out batches with credit-based flow control: the gateway never
// holds more than `ahead` batches for the caller that the caller has not asked for.
type BatchStream struct {
	stream  clothov1.GatewayService_StreamBatchesClient
	cancel  context.CancelFunc
	handed  bool
	closeMu sync.Once
}

// Batches opens StreamBatches and grants `ahead` credits (at least 1). Each Next
// after the first grants one more credit, for the batch just consumed.
func (c *Client) Batches(ctx context.Context, ahead uint32) (*BatchStream, error) {
	if ahead == 0 {
		ahead = 1
	}
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.Gateway.StreamBatches(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("clotho: stream batches: %w", err)
	}
	if err := stream.Send(&clothov1.StreamBatchesRequest{Credits: ahead}); err != nil {
		cancel()
		return nil, fmt.Errorf("clotho: stream batches: grant %d credits: %w", ahead, err)
	}
	return &BatchStream{stream: stream, cancel: cancel}, nil
}

// Next waits for the next batch; io.EOF (wrapped) when the gateway ended the stream.
func (b *BatchStream) Next() (*clothov1.StreamBatchesResponse, error) {
	if b.handed {
		if err := b.stream.Send(&clothov1.StreamBatchesRequest{Credits: 1}); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("clotho: stream batches: grant credit: %w", err)
		}
	}
	batch, err := b.stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("clotho: stream batches: %w", err)
	}
	b.handed = true
	return batch, nil
}

// Close ends the stream (the gateway stops sending; unsent credits are dropped).
func (b *BatchStream) Close() {
	b.closeMu.Do(func() {
		_ = b.stream.CloseSend()
		b.cancel()
	})
}
