// Command spiffeprobe is the go-spiffe v2 peer of the interop tests (docs/architecture.md,
// "Interop peers"): it talks to a SPIFFE Workload API (ours or SPIRE's) and to SPIFFE bundle
// endpoints exactly as a stock Go workload would, through go-spiffe's workloadapi, x509svid,
// jwtsvid, spiffebundle and federation packages, and prints one JSON object per run.
//
//	spiffeprobe x509 -socket PATH              FetchX509Context; each SVID checked with x509svid.Verify
//	spiffeprobe x509-bundles -socket PATH      FetchX509Bundles
//	spiffeprobe jwt -socket PATH -audience A [-spiffe-id ID]
//	                                           FetchJWTSVID, then workloadapi.ValidateJWTSVID and
//	                                           jwtsvid.ParseAndValidate against FetchJWTBundles
//	spiffeprobe jwt-bundles -socket PATH       FetchJWTBundles (each bundle as its JWKS)
//	spiffeprobe verify -chain PEM -bundle FILE -trust-domain TD
//	                                           x509svid.Verify of a PEM chain against a SPIFFE bundle
//	spiffeprobe verify-jwt -token T -audience A -bundle FILE -trust-domain TD
//	                                           jwtsvid.ParseAndValidate against a SPIFFE bundle
//	spiffeprobe fetch-bundle -trust-domain TD -url URL (-web-roots PEM | -endpoint-id ID -endpoint-bundle FILE)
//	                                           federation.FetchBundle, https_web or https_spiffe
//	                                           (SPIFFE Federation §5.2, §5.3)
//	spiffeprobe tls-dial -socket PATH -addr HOST:PORT -peer-id ID -send TEXT
//	                                           spiffetls mTLS client with the Workload API's SVID: send
//	                                           TEXT, close the write side, print what came back
//	spiffeprobe tls-serve -socket PATH -addr HOST:PORT -peer-id ID
//	                                           spiffetls mTLS server for one connection: prints its
//	                                           address first, answers "echo: " and what it read
//
// Exit status: 0 when every fetch and check succeeded; 1 when one failed (the JSON object says
// which, in "error" or in a per-item "verify_error"); 2 for a usage error.
package main

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

type object = map[string]any

// failed marks a result whose JSON is printed but whose exit status is 1.
type failed struct{ out object }

func (f failed) Error() string { return fmt.Sprint(f.out["error"]) }

func main() {
	if len(os.Args) < 2 {
		usage("a subcommand is required")
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	socket := fs.String("socket", "", "the Workload API's Unix socket path")
	timeout := fs.Duration("timeout", 20*time.Second, "deadline for the whole run")
	audience := fs.String("audience", "", "JWT-SVID audience")
	spiffeID := fs.String("spiffe-id", "", "the SPIFFE ID to ask a JWT-SVID for (optional)")
	chain := fs.String("chain", "", "a PEM file: leaf first, then intermediates")
	bundlePath := fs.String("bundle", "", "a SPIFFE bundle (JWKS) file")
	trustDomain := fs.String("trust-domain", "", "the trust domain of -bundle, or of the bundle endpoint")
	token := fs.String("token", "", "a JWT-SVID")
	url := fs.String("url", "", "the bundle endpoint URL")
	webRoots := fs.String("web-roots", "", "https_web: a PEM file of roots for the endpoint's certificate")
	endpointID := fs.String("endpoint-id", "", "https_spiffe: the endpoint server's SPIFFE ID")
	endpointBundle := fs.String("endpoint-bundle", "", "https_spiffe: the SPIFFE bundle of the endpoint's trust domain")
	tlsAddr := fs.String("addr", "", "tls-dial, tls-serve: HOST:PORT")
	peerID := fs.String("peer-id", "", "tls-dial, tls-serve: the SPIFFE ID the peer must present")
	send := fs.String("send", "", "tls-dial: what to send")
	_ = fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	addr := func() workloadapi.ClientOption {
		if *socket == "" {
			usage(cmd + " needs -socket")
		}
		return workloadapi.WithAddr("unix://" + *socket)
	}

	var out object
	var err error
	switch cmd {
	case "x509":
		out, err = fetchX509(ctx, addr())
	case "x509-bundles":
		out, err = fetchX509Bundles(ctx, addr())
	case "jwt":
		if *audience == "" {
			usage("jwt needs -audience")
		}
		out, err = fetchJWT(ctx, addr(), *audience, *spiffeID)
	case "jwt-bundles":
		out, err = fetchJWTBundles(ctx, addr())
	case "verify":
		if *chain == "" || *bundlePath == "" || *trustDomain == "" {
			usage("verify needs -chain, -bundle and -trust-domain")
		}
		out, err = verifyChain(*chain, *bundlePath, *trustDomain)
	case "verify-jwt":
		if *token == "" || *audience == "" || *bundlePath == "" || *trustDomain == "" {
			usage("verify-jwt needs -token, -audience, -bundle and -trust-domain")
		}
		out, err = verifyJWT(*token, *audience, *bundlePath, *trustDomain)
	case "fetch-bundle":
		if *trustDomain == "" || *url == "" || (*webRoots == "") == (*endpointID == "") {
			usage("fetch-bundle needs -trust-domain, -url and one of -web-roots or -endpoint-id (with -endpoint-bundle)")
		}
		out, err = fetchBundle(ctx, *trustDomain, *url, *webRoots, *endpointID, *endpointBundle)
	case "tls-dial":
		if *tlsAddr == "" || *peerID == "" {
			usage("tls-dial needs -addr and -peer-id")
		}
		out, err = tlsDial(ctx, addr(), *tlsAddr, *peerID, *send)
	case "tls-serve":
		if *tlsAddr == "" || *peerID == "" {
			usage("tls-serve needs -addr and -peer-id")
		}
		out, err = tlsServe(ctx, addr(), *tlsAddr, *peerID)
	default:
		usage("unknown subcommand " + cmd)
	}
	var f failed
	switch {
	case errors.As(err, &f):
		emit(f.out, 1)
	case err != nil:
		emit(object{"error": err.Error()}, 1)
	default:
		emit(out, 0)
	}
}

func usage(msg string) {
	fmt.Fprintln(os.Stderr, "spiffeprobe:", msg)
	fmt.Fprintln(os.Stderr, "subcommands: x509, x509-bundles, jwt, jwt-bundles, verify, verify-jwt, fetch-bundle, tls-dial, tls-serve")
	os.Exit(2)
}

func emit(out object, code int) {
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "spiffeprobe:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func certsJSON(certs []*x509.Certificate) (string, []string) {
	var pemText strings.Builder
	der := make([]string, 0, len(certs))
	for _, c := range certs {
		_ = pem.Encode(&pemText, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		der = append(der, base64.StdEncoding.EncodeToString(c.Raw))
	}
	return pemText.String(), der
}

func x509BundlesJSON(set *x509bundle.Set) object {
	out := object{}
	for _, b := range set.Bundles() {
		p, der := certsJSON(b.X509Authorities())
		out[b.TrustDomain().Name()] = object{"pem": p, "der": der}
	}
	return out
}

func fetchX509(ctx context.Context, addr workloadapi.ClientOption) (object, error) {
	x509ctx, err := workloadapi.FetchX509Context(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("FetchX509Context: %w", err)
	}
	svids := make([]object, 0, len(x509ctx.SVIDs))
	ok := true
	for _, s := range x509ctx.SVIDs {
		p, der := certsJSON(s.Certificates)
		item := object{
			"spiffe_id": s.ID.String(),
			"hint":      s.Hint,
			"chain_pem": p,
			"chain_der": der,
			"not_after": s.Certificates[0].NotAfter.UTC().Format(time.RFC3339),
		}
		// x509svid.Verify: the chain verifies to the bundle of the SVID's own trust domain
		// (X509-SVID §5.2), with the leaf and CA rules of X509-SVID §4.
		id, chains, verr := x509svid.Verify(s.Certificates, x509ctx.Bundles)
		if verr != nil {
			item["verify_error"] = verr.Error()
			ok = false
		} else {
			item["verified_id"] = id.String()
			item["verified_chain_length"] = len(chains[0])
		}
		svids = append(svids, item)
	}
	out := object{"svids": svids, "bundles": x509BundlesJSON(x509ctx.Bundles)}
	if !ok {
		out["error"] = "an SVID did not verify against the fetched bundles"
		return nil, failed{out}
	}
	return out, nil
}

func fetchX509Bundles(ctx context.Context, addr workloadapi.ClientOption) (object, error) {
	set, err := workloadapi.FetchX509Bundles(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("FetchX509Bundles: %w", err)
	}
	return object{"bundles": x509BundlesJSON(set)}, nil
}

func jwtBundlesJSON(set *jwtbundle.Set) (object, error) {
	out := object{}
	for _, b := range set.Bundles() {
		raw, err := b.Marshal()
		if err != nil {
			return nil, fmt.Errorf("marshal the JWT bundle of %s: %w", b.TrustDomain(), err)
		}
		kids := make([]string, 0)
		for kid := range b.JWTAuthorities() {
			kids = append(kids, kid)
		}
		sort.Strings(kids)
		out[b.TrustDomain().Name()] = object{"jwks": json.RawMessage(raw), "kids": kids}
	}
	return out, nil
}

func fetchJWTBundles(ctx context.Context, addr workloadapi.ClientOption) (object, error) {
	set, err := workloadapi.FetchJWTBundles(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("FetchJWTBundles: %w", err)
	}
	bundles, err := jwtBundlesJSON(set)
	if err != nil {
		return nil, err
	}
	return object{"bundles": bundles}, nil
}

func fetchJWT(ctx context.Context, addr workloadapi.ClientOption, audience, spiffeID string) (object, error) {
	params := jwtsvid.Params{Audience: audience}
	if spiffeID != "" {
		id, err := spiffeid.FromString(spiffeID)
		if err != nil {
			return nil, fmt.Errorf("-spiffe-id: %w", err)
		}
		params.Subject = id
	}
	svid, err := workloadapi.FetchJWTSVID(ctx, params, addr)
	if err != nil {
		return nil, fmt.Errorf("FetchJWTSVID: %w", err)
	}
	token := svid.Marshal()
	out := object{
		"spiffe_id": svid.ID.String(),
		"audience":  svid.Audience,
		"expiry":    svid.Expiry.UTC().Format(time.RFC3339),
		"hint":      svid.Hint,
		"token":     token,
	}
	ok := true
	// The Workload API's own check (SPIFFE Workload API §6.2.3, ValidateJWTSVID).
	if v, verr := workloadapi.ValidateJWTSVID(ctx, token, audience, addr); verr != nil {
		out["validate_error"] = verr.Error()
		ok = false
	} else {
		out["validated_id"] = v.ID.String()
		out["validated_claims"] = v.Claims
	}
	// The workload's own check against the fetched JWT bundles (JWT-SVID §7).
	set, err := workloadapi.FetchJWTBundles(ctx, addr)
	if err != nil {
		out["parse_and_validate_error"] = "FetchJWTBundles: " + err.Error()
		ok = false
	} else if p, perr := jwtsvid.ParseAndValidate(token, set, []string{audience}); perr != nil {
		out["parse_and_validate_error"] = perr.Error()
		ok = false
	} else {
		out["parsed_id"] = p.ID.String()
	}
	if !ok {
		out["error"] = "the JWT-SVID did not validate"
		return nil, failed{out}
	}
	return out, nil
}

func readChain(path string) ([]*x509.Certificate, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, raw = pem.Decode(raw)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no CERTIFICATE block", path)
	}
	return certs, nil
}

func loadBundle(path, td string) (*spiffebundle.Bundle, error) {
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, fmt.Errorf("-trust-domain: %w", err)
	}
	b, err := spiffebundle.Load(trustDomain, path)
	if err != nil {
		return nil, fmt.Errorf("spiffebundle.Load: %w", err)
	}
	return b, nil
}

func spiffeBundleJSON(b *spiffebundle.Bundle) (object, error) {
	raw, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("marshal the bundle of %s: %w", b.TrustDomain(), err)
	}
	out := object{
		"trust_domain":     b.TrustDomain().Name(),
		"bundle":           json.RawMessage(raw),
		"x509_authorities": len(b.X509Authorities()),
		"jwt_authorities":  len(b.JWTAuthorities()),
	}
	if seq, ok := b.SequenceNumber(); ok {
		out["sequence_number"] = seq
	}
	if hint, ok := b.RefreshHint(); ok {
		out["refresh_hint_seconds"] = hint.Seconds()
	}
	return out, nil
}

func verifyChain(chainPath, bundlePath, td string) (object, error) {
	certs, err := readChain(chainPath)
	if err != nil {
		return nil, err
	}
	b, err := loadBundle(bundlePath, td)
	if err != nil {
		return nil, err
	}
	id, chains, err := x509svid.Verify(certs, b)
	if err != nil {
		return nil, failed{object{"error": err.Error(), "verify_error": err.Error()}}
	}
	return object{"spiffe_id": id.String(), "verified_chain_length": len(chains[0])}, nil
}

func verifyJWT(token, audience, bundlePath, td string) (object, error) {
	b, err := loadBundle(bundlePath, td)
	if err != nil {
		return nil, err
	}
	svid, err := jwtsvid.ParseAndValidate(token, b, []string{audience})
	if err != nil {
		return nil, failed{object{"error": err.Error(), "parse_and_validate_error": err.Error()}}
	}
	return object{"spiffe_id": svid.ID.String(), "claims": svid.Claims}, nil
}

func fetchBundle(ctx context.Context, td, url, webRoots, endpointID, endpointBundle string) (object, error) {
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return nil, fmt.Errorf("-trust-domain: %w", err)
	}
	var opt federation.FetchOption
	profile := "https_web"
	if webRoots != "" {
		roots, err := readChain(webRoots)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		for _, c := range roots {
			pool.AddCert(c)
		}
		opt = federation.WithWebPKIRoots(pool)
	} else {
		profile = "https_spiffe"
		id, err := spiffeid.FromString(endpointID)
		if err != nil {
			return nil, fmt.Errorf("-endpoint-id: %w", err)
		}
		if endpointBundle == "" {
			usage("https_spiffe needs -endpoint-bundle")
		}
		b, err := loadBundle(endpointBundle, id.TrustDomain().Name())
		if err != nil {
			return nil, err
		}
		opt = federation.WithSPIFFEAuth(b, id)
	}
	b, err := federation.FetchBundle(ctx, trustDomain, url, opt)
	if err != nil {
		return nil, fmt.Errorf("federation.FetchBundle (%s): %w", profile, err)
	}
	out, err := spiffeBundleJSON(b)
	if err != nil {
		return nil, err
	}
	out["profile"] = profile
	return out, nil
}

// tlsDial connects with spiffetls as a stock go-spiffe mTLS client: its SVID from the Workload API,
// the server authorized by its exact SPIFFE ID.
func tlsDial(ctx context.Context, addr workloadapi.ClientOption, target, peer, send string) (object, error) {
	id, err := spiffeid.FromString(peer)
	if err != nil {
		return nil, err
	}
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(addr))
	if err != nil {
		return nil, err
	}
	defer source.Close()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", target, spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(id), source))
	if err != nil {
		return nil, failed{object{"error": "dial: " + err.Error()}}
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, send); err != nil {
		return nil, failed{object{"error": "send: " + err.Error()}}
	}
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return nil, failed{object{"error": "close write: " + err.Error()}}
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		return nil, failed{object{"error": "read: " + err.Error(), "received": string(got)}}
	}
	return object{"received": string(got)}, nil
}

// tlsServe serves one spiffetls mTLS connection as a stock go-spiffe server: its SVID from the
// Workload API, the client authorized by its exact SPIFFE ID.  It prints its address first (one
// JSON line), then the result.
func tlsServe(ctx context.Context, addr workloadapi.ClientOption, listen, peer string) (object, error) {
	id, err := spiffeid.FromString(peer)
	if err != nil {
		return nil, err
	}
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(addr))
	if err != nil {
		return nil, err
	}
	defer source.Close()
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", listen, spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(id), source))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(object{"listening": ln.Addr().String()}); err != nil {
		return nil, err
	}
	conn, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	got, err := io.ReadAll(conn)
	if err != nil {
		return nil, failed{object{"error": "read: " + err.Error()}}
	}
	if _, err := io.WriteString(conn, "echo: "+string(got)); err != nil {
		return nil, failed{object{"error": "write: " + err.Error()}}
	}
	return object{"received": string(got)}, nil
}
