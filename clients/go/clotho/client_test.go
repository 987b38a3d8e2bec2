package clotho

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	clothov1 "github.com/clotho/clotho/clients/go/gen/clotho/v1"
)

const token = "go-secret"

// fakeGateway records metadata and credits; it refuses calls without the token when
// it has one, and sends a batch per credit.
type fakeGateway struct {
	clothov1.UnimplementedGatewayServiceServer
	token string

	mu       sync.Mutex
	metadata []metadata.MD
	credits  []uint32
	groups   int
}

func (f *fakeGateway) check(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.metadata = append(f.metadata, md)
	f.mu.Unlock()
	if f.token == "" {
		return nil
	}
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+f.token {
		return status.Error(codes.Unauthenticated, "missing bearer token")
	}
	return nil
}

func (f *fakeGateway) GetInfo(ctx context.Context, _ *clothov1.GetInfoRequest) (*clothov1.GetInfoResponse, error) {
	if err := f.check(ctx); err != nil {
		return nil, err
	}
	return &clothov1.GetInfoResponse{BatchSize: 4, MaxTokenLen: 32}, nil
}

func (f *fakeGateway) SubmitScoredData(stream clothov1.GatewayService_SubmitScoredDataServer) error {
	if err := f.check(stream.Context()); err != nil {
		return err
	}
	n := 0
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		n++
	}
	f.mu.Lock()
	f.groups += n
	f.mu.Unlock()
	return stream.SendAndClose(&clothov1.SubmitScoredDataResponse{Received: uint64(n)})
}

func (f *fakeGateway) Generate(req *clothov1.GatewayServiceGenerateRequest, stream clothov1.GatewayService_GenerateServer) error {
	if err := f.check(stream.Context()); err != nil {
		return err
	}
	n := req.GetRequest().GetSamplingParams().GetN()
	if n == 0 {
		n = 1
	}
	// Out of order on purpose: the client sorts by sample index.
	for i := int(n) - 1; i >= 0; i-- {
		ids := []int32{req.GetRequest().GetInputIds()[0], int32(100 + i)}
		msg := &clothov1.GenerateResponse{Index: uint32(i), Payload: &clothov1.GenerateResponse_Completion{
			Completion: &clothov1.Completion{OutputIds: ids, OutputLogprobs: []float32{-0.5, -1.5}},
		}}
		if err := stream.Send(&clothov1.GatewayServiceGenerateResponse{Response: msg}); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeGateway) StreamBatches(stream clothov1.GatewayService_StreamBatchesServer) error {
	if err := f.check(stream.Context()); err != nil {
		return err
	}
	step := uint64(0)
	for {
		req, err := stream.Recv()
		if err != nil {
			return nil
		}
		f.mu.Lock()
		f.credits = append(f.credits, req.GetCredits())
		f.mu.Unlock()
		for k := uint32(0); k < req.GetCredits(); k++ {
			step++
			seq := &clothov1.ScoredSequence{Tokens: []int32{1, 2}, Masks: []int32{-100, 2}, InferenceLogprobs: []float32{0, -0.25}}
			version := step
			seq.PolicyVersion = &version
			batch := &clothov1.StreamBatchesResponse{Step: step, Groups: []*clothov1.ScoredGroup{{Sequences: []*clothov1.ScoredSequence{seq}}}}
			if err := stream.Send(batch); err != nil {
				return nil
			}
		}
	}
}

func start(t *testing.T, serverToken string, opts ...grpc.DialOption) (*Client, *fakeGateway) {
	t.Helper()
	listener := bufconn.Listen(1 << 20)
	fake := &fakeGateway{token: serverToken}
	server := grpc.NewServer()
	clothov1.RegisterGatewayServiceServer(server, fake)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	dialer := func(ctx context.Context, _ string) (net.Conn, error) { return listener.Dial() }
	all := append([]grpc.DialOption{grpc.WithContextDialer(dialer), grpc.WithInsecure()}, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "bufnet", all...)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, fake
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestBearerToken(t *testing.T) {
	cases := []struct {
		name        string
		serverToken string
		clientToken string
		want        codes.Code
	}{
		{"open gateway, no token", "", "", codes.OK},
		{"open gateway, a token", "", token, codes.OK},
		{"guarded gateway, no token", token, "", codes.Unauthenticated},
		{"guarded gateway, wrong token", token, "other", codes.Unauthenticated},
		{"guarded gateway, its token", token, token, codes.OK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := start(t, tc.serverToken, BearerToken(tc.clientToken)...)
			ctx := testContext(t)
			_, unaryErr := c.Gateway.GetInfo(ctx, &clothov1.GetInfoRequest{})
			_, streamErr := c.Submit(ctx, []*clothov1.ScoredGroup{{}})
			for kind, err := range map[string]error{"unary": unaryErr, "stream": streamErr} {
				if got := Code(err); got != tc.want {
					t.Errorf("%s call: code %v, want %v (err %v)", kind, got, tc.want, err)
				}
			}
		})
	}
}

func TestTraceContext(t *testing.T) {
	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	cases := []struct {
		name  string
		trace *TraceContext
		want  []string
	}{
		{"no trace context", nil, nil},
		{"traceparent only", &TraceContext{Traceparent: parent}, []string{parent}},
		{"with tracestate", &TraceContext{Traceparent: parent, Tracestate: "k=v"}, []string{parent}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, fake := start(t, "")
			ctx := testContext(t)
			if tc.trace != nil {
				ctx = WithTraceContext(ctx, *tc.trace)
			}
			if _, err := c.Generate(ctx, &clothov1.GenerateRequest{InputIds: []int32{7}}); err != nil {
				t.Fatal(err)
			}
			md := fake.metadata[len(fake.metadata)-1]
			if got := md.Get("traceparent"); fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("traceparent %v, want %v", got, tc.want)
			}
			if tc.trace != nil && tc.trace.Tracestate != "" {
				if got := md.Get("tracestate"); len(got) != 1 || got[0] != tc.trace.Tracestate {
					t.Errorf("tracestate %v", got)
				}
			}
		})
	}
}

func TestGenerateOrdersSamples(t *testing.T) {
	for _, n := range []uint32{1, 3} {
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
			c, _ := start(t, "")
			completions, err := c.Generate(testContext(t), &clothov1.GenerateRequest{
				InputIds: []int32{9}, SamplingParams: &clothov1.SamplingParams{N: &n},
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(completions) != int(n) {
				t.Fatalf("%d completions, want %d", len(completions), n)
			}
			for i, completion := range completions {
				if got := completion.GetOutputIds()[1]; got != int32(100+i) {
					t.Errorf("sample %d: output %v", i, completion.GetOutputIds())
				}
			}
		})
	}
}

func TestBatchesGrantOneCreditPerBatchConsumed(t *testing.T) {
	cases := []struct {
		ahead, take uint32
		wantCredits []uint32
	}{
		{ahead: 1, take: 3, wantCredits: []uint32{1, 1, 1}},
		{ahead: 2, take: 3, wantCredits: []uint32{2, 1, 1}},
		{ahead: 0, take: 1, wantCredits: []uint32{1}},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("ahead=%d take=%d", tc.ahead, tc.take), func(t *testing.T) {
			c, fake := start(t, "")
			stream, err := c.Batches(testContext(t), tc.ahead)
			if err != nil {
				t.Fatal(err)
			}
			for i := uint32(0); i < tc.take; i++ {
				batch, err := stream.Next()
				if err != nil {
					t.Fatal(err)
				}
				seq := batch.GetGroups()[0].GetSequences()[0]
				if batch.GetStep() != uint64(i+1) || seq.GetPolicyVersion() != uint64(i+1) {
					t.Errorf("batch %d: step %d, version %d", i, batch.GetStep(), seq.GetPolicyVersion())
				}
			}
			stream.Close()
			// The credit for the last batch is granted on the next Next, never earlier.
			deadline := time.Now().Add(5 * time.Second)
			for {
				fake.mu.Lock()
				got := append([]uint32(nil), fake.credits...)
				fake.mu.Unlock()
				if fmt.Sprint(got) == fmt.Sprint(tc.wantCredits[:len(got)]) && len(got) >= int(tc.take) {
					if len(got) != len(tc.wantCredits) {
						t.Errorf("credits %v, want %v", got, tc.wantCredits)
					}
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("credits %v, want %v", got, tc.wantCredits)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

func TestErrorsWrapTheStatus(t *testing.T) {
	c, _ := start(t, token)
	_, err := c.Submit(testContext(t), nil)
	if err == nil {
		t.Fatal("no error")
	}
	if Code(err) != codes.Unauthenticated {
		t.Errorf("Code(%v) = %v", err, Code(err))
	}
	var withStatus interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &withStatus) {
		t.Errorf("%v does not wrap a status", err)
	}
	if Code(nil) != codes.OK || Code(io.EOF) != codes.Unknown {
		t.Error("Code of nil / a plain error")
	}
}
