// grpc_load: the gRPC unary load generator of bench/vote_bench.py, in Go so that the client
// costs the 2-core machine a fraction of what the servers do (the Python client took about
// a sixth of the machine, and its own lag went into the latencies it reported).
//
// It knows nothing of televote's messages: vote_bench serializes the requests and marks
// where each carries its request id (a 36-character UUID placeholder); every call gets a
// fresh UUID there, so every call is a new vote. Replies are passed back as bytes.
//
// Reads a JSON job on stdin:
//
//	{"targets": ["host:port", ...], "method": "/pkg.Service/Method", "seconds": 8,
//	 "concurrency": 64, "rate": 0, "templates": [{"body": "<hex>", "uuid_at": [2]}],
//	 "metadata": [["authorization", "Bearer ..."], ...],
//	 "tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "server_name": "vote-svc"}}
//
// With "tls" it connects with mutual TLS as the holder of that certificate (a mesh peer:
// the edge, to call a service directly as the edge does), else in plaintext.
//
// rate 0 is a closed loop of `concurrency` callers per target; rate > 0 is an open loop
// starting that many calls per second in all. Call n uses templates[n % len] and
// metadata[n % len]. Writes one line per OK call, "<latency ms> <reply hex>", and last
// "failed <count>".
//
// With "every_call": true (the overload test, tests/overload_support.py) it writes one line
// per call instead, OK or not: "<grpc code> <latency ms> <late ms> <hex>", the hex being the
// reply, or the google.rpc.Status of a failure (its ErrorInfo and RetryInfo); in an open
// loop the latency counts from the call's planned moment and "late" is how far behind that
// moment it was started (the generator's own lag); a closed-loop caller honours a refusal's
// RetryInfo delay before its next call, as a client should. "start_at" (Unix ms) starts the
// run at that moment, so that several generators share one plan; "local_addr" is the
// address its connections come from.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang/protobuf/proto"
	"github.com/golang/protobuf/ptypes"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// tick is how often an open loop wakes to start the calls due (see main).
const tick = 4 * time.Millisecond

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// retryDelay is the RetryInfo delay a refusal asks for, or 0.
func retryDelay(s *status.Status) time.Duration {
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok {
			if d, err := ptypes.Duration(info.RetryDelay); err == nil {
				return d
			}
		}
	}
	return 0
}

type template struct {
	Body   string `json:"body"`
	UUIDAt []int  `json:"uuid_at"`
	body   []byte
}

type job struct {
	Targets     []string    `json:"targets"`
	Method      string      `json:"method"`
	Seconds     float64     `json:"seconds"`
	Concurrency int         `json:"concurrency"`
	Rate        float64     `json:"rate"`
	Templates   []*template `json:"templates"`
	Metadata    [][2]string `json:"metadata"`
	TLS         *tlsConfig  `json:"tls"`
	EveryCall   bool        `json:"every_call"`
	StartAt     int64       `json:"start_at"`
	LocalAddr   string      `json:"local_addr"`
}

type tlsConfig struct {
	Cert       string `json:"cert"`
	Key        string `json:"key"`
	CA         string `json:"ca"`
	ServerName string `json:"server_name"`
}

// transport is plaintext, or mutual TLS with the job's certificate when it names one.
func transport(c *tlsConfig) grpc.DialOption {
	if c == nil {
		return grpc.WithInsecure()
	}
	pair, err := tls.LoadX509KeyPair(c.Cert, c.Key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tls:", err)
		os.Exit(2)
	}
	ca, err := ioutil.ReadFile(c.CA)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tls:", err)
		os.Exit(2)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca)
	return grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pair}, RootCAs: roots, ServerName: c.ServerName}))
}

// rawCodec sends and receives messages as the bytes they already are.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type result struct {
	ms    float64
	reply []byte
	code  codes.Code
	late  float64
}

func newUUID(into []byte) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	hex.Encode(into[0:8], b[0:4])
	into[8] = '-'
	hex.Encode(into[9:13], b[4:6])
	into[13] = '-'
	hex.Encode(into[14:18], b[6:8])
	into[18] = '-'
	hex.Encode(into[19:23], b[8:10])
	into[23] = '-'
	hex.Encode(into[24:36], b[10:16])
}

func main() {
	var j job
	if err := json.NewDecoder(os.Stdin).Decode(&j); err != nil {
		fmt.Fprintln(os.Stderr, "bad job:", err)
		os.Exit(2)
	}
	for _, t := range j.Templates {
		body, err := hex.DecodeString(t.Body)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad template:", err)
			os.Exit(2)
		}
		t.body = body
	}
	// One HTTP/2 connection per target entry, as one gRPC channel is one connection.
	conns := make([]*grpc.ClientConn, len(j.Targets))
	for i, target := range j.Targets {
		options := []grpc.DialOption{transport(j.TLS),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}))}
		if j.LocalAddr != "" {
			// Calls from this source address (a loopback one of its own: the edge's
			// per-IP bucket is per generator, as it is per NAT for real viewers).
			dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(j.LocalAddr)}}
			options = append(options, grpc.WithContextDialer(
				func(ctx context.Context, address string) (net.Conn, error) {
					return dialer.DialContext(ctx, "tcp", address)
				}))
		}
		conn, err := grpc.Dial(target, options...)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			os.Exit(1)
		}
		defer conn.Close()
		conns[i] = conn
	}

	var sent int64
	var failed int64
	var mu sync.Mutex
	var results []result
	// call makes call n; planned is when it was meant to start (the zero time: now). It
	// returns the retry delay a refusal asked for.
	call := func(planned time.Time) time.Duration {
		n := atomic.AddInt64(&sent, 1) - 1
		t := j.Templates[n%int64(len(j.Templates))]
		body := append([]byte(nil), t.body...)
		for _, at := range t.UUIDAt {
			newUUID(body[at : at+36])
		}
		md := j.Metadata[n%int64(len(j.Metadata))]
		ctx, cancel := context.WithTimeout(
			metadata.AppendToOutgoingContext(context.Background(), md[0], md[1]), 30*time.Second)
		defer cancel()
		var reply []byte
		start := time.Now()
		if planned.IsZero() {
			planned = start
		}
		err := conns[n%int64(len(conns))].Invoke(ctx, j.Method, &body, &reply)
		ms := millis(time.Since(planned))
		late := millis(start.Sub(planned))
		if err != nil {
			atomic.AddInt64(&failed, 1)
			if !j.EveryCall {
				return 0
			}
			s := status.Convert(err)
			detail, _ := proto.Marshal(s.Proto())
			mu.Lock()
			results = append(results, result{ms, detail, s.Code(), late})
			mu.Unlock()
			return retryDelay(s)
		}
		mu.Lock()
		results = append(results, result{ms, reply, codes.OK, late})
		mu.Unlock()
		return 0
	}

	if j.StartAt > 0 {
		time.Sleep(time.Until(time.Unix(0, j.StartAt*int64(time.Millisecond))))
	}
	end := time.Now().Add(time.Duration(j.Seconds * float64(time.Second)))
	var wg sync.WaitGroup
	if j.Rate <= 0 {
		for i := 0; i < j.Concurrency*len(conns); i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					if delay := call(time.Time{}); j.EveryCall && delay > 0 {
						time.Sleep(delay)
					}
				}
			}()
		}
	} else {
		// Calls start in ticks: one wake-up starts every call due by then, instead of a
		// timer per call, which at thousands of calls a second cost the generator about
		// as much CPU as the calls themselves, CPU the mesh beside it then lacked. A call
		// started late by the tick counts its latency from its planned moment all the same.
		interval := time.Duration(float64(time.Second) / j.Rate)
		for next := time.Now(); next.Before(end); {
			for now := time.Now(); !next.After(now) && next.Before(end); next = next.Add(interval) {
				wg.Add(1)
				go func(planned time.Time) {
					defer wg.Done()
					call(planned)
				}(next)
			}
			wait := time.Until(next)
			if wait < tick {
				wait = tick
			}
			time.Sleep(wait)
		}
	}
	wg.Wait()

	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for _, r := range results {
		if j.EveryCall {
			fmt.Fprintf(out, "%d %.3f %.3f %s\n", r.code, r.ms, r.late, hex.EncodeToString(r.reply))
		} else {
			fmt.Fprintf(out, "%.3f %s\n", r.ms, hex.EncodeToString(r.reply))
		}
	}
	fmt.Fprintf(out, "failed %d\n", failed)
}
